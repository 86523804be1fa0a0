"""Every name inside a run directory, in one place: the stage that writes a file and every stage
that reads it take the name from here, so a file is never renamed on one side only.

The names are the on-disk contract with runs written by earlier versions: change none of them.
docs/architecture.md's table says which stage writes and reads each."""

# The run's own files (evaluate writes them; predict, export, finetune, inspect and report read them).
MARKER = ".featurepipe-run"         # written when the folder becomes a run (the run directory's marker)
CONFIG = "config.json"              # evaluate: dataset, search, cache root, fingerprints, versions
LEADERBOARD = "leaderboard.csv"     # evaluate: one row per (feature set, head, params, augment), ranked
FOLDS = "folds.csv"                 # evaluate: per-fold metrics of every row
OOF = "oof_predictions.csv"         # evaluate: out-of-fold probabilities of every row
NESTED = "nested.json"              # evaluate: the nested-CV headline (absent with --no-nested / < 3 folds)
NESTED_FOLDS = "nested_folds.csv"
NESTED_OOF = "nested_oof.csv"
HOLDOUT = "holdout.csv"             # evaluate: the refit model on the validation/test split, when there is one
HEAD_META = "best_head.json"
HEAD_JOBLIB = "best_head.joblib"    # the best head, a scikit-learn one (best_head.json names it and its sha256)
HEAD_KERAS = "best_head.keras"      # the best head, the Keras dense one
VOTE = "vote"          # best_head.json's head when the run's model averages heads on several feature sets
MEMBERS_DIR = "members"
MODEL_META = "model.json"   # written by fine-tuning: the run's model, when there is one
# The dense head's training curve (epoch, loss, val_loss on its early-stopping hold-out), beside the
# head when the best head is the dense one; the report draws it.
HEAD_HISTORY = "best_head_history.csv"
REPORT = "report.html"
REPORT_DIR = "report"               # the report's charts as PNG files
LOGS_DIR = "logs"                   # TensorBoard logs of finetune and baseline (when tensorboard is installed)

# RUN/inspect/: what `inspect` found (the report's data-quality sections read them).
INSPECT_DIR = "inspect"
INSPECT_JSON = "inspect.json"
INSPECT_HTML = "inspect.html"       # the inspect-only page, when inspect runs outside a run
DUPLICATES = "duplicates.csv"
EMBEDDING = "embedding.csv"
LABEL_SCORES = "label_scores.csv"
SUSPECTS = "suspects.csv"
LEARNING_CURVE = "learning_curve.csv"

# RUN/finetune/: fine-tuning's split, resume state, curves, weights, model and verdict.
FINETUNE_DIR = "finetune"
SPLIT = "split.json"                # finetune and baseline: which images train, validate and test
STATE = "state.json"                # finetune: its key and phase, for --resume
HISTORY = "history.csv"             # finetune and baseline: per-epoch curves
SUMMARY = "summary.json"            # finetune and baseline: the outcome the report shows
FINETUNED_MODEL = "finetuned.keras"
VALIDATION_PREDICTIONS = "validation_predictions.csv"
TEACHER_TARGETS = "teacher_targets.csv"   # the student's targets per training image (training.distill)
BEST_WEIGHTS = "best.weights.npz"
PRETRAINED_WEIGHTS = "pretrained.weights.npz"
BACKUP_DIR = "backup"               # crash-safe epoch backups (training.checkpoints), one folder per phase
BACKUP_RECORD = "latest.json"       # in a backup folder: which epoch file is the last whole one
# finetune's weights as earlier versions named them: a fresh start clears them too.
OLD_FINETUNE_WEIGHTS = ("best.weights.h5", "pretrained.weights.h5")

# RUN/baseline/: the small convnet trained from scratch.
BASELINE_DIR = "baseline"
BASELINE_WEIGHTS = "best.weights.h5"
BASELINE_MODEL = "baseline.keras"

# An export folder (`export --out`).
EXPORT_META = "export.json"
EXPORT_KERAS = "model.keras"
