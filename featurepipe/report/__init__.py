"""Stage `report`: the run's HTML page (write.write_report) and the inspect page
(inspect_sections.write_inspect_report).

Inside the package imports go one way: html, configs, thumbnails and analysis (building blocks) <
charts < context (the run, read once) < sections, training_sections, reproduce, inspect_sections
(one function per section) < write (the SECTIONS list, in page order).
"""
