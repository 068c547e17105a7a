"""The one place for every default the stages and entry points share.

MLproject repeats these values as its parameter defaults (MLflow needs them there);
``tests/unit/test_project_files.py`` checks that the two agree.
"""

IMAGE_SIZE = 224
EPOCHS = 60
BATCH_SIZE = 32
# The paper gives SGD with momentum 0.9 but no learning rate; see docs/choices.md.
LEARNING_RATE = 1e-3
MOMENTUM = 0.9
DROPOUT = 0.5
DENSE_UNITS = 1000
# The paper says "Dense(1000)" and is silent on its activation; see docs/choices.md.
DENSE_ACTIVATION = "relu"
# ResNet heads use AveragePooling2D; the paper gives no pool size. 7 is the final
# feature-map side at 224 px, so the pooling covers the whole map (clipped for smaller inputs).
POOL_SIZE = 7
# Train the BatchNorm layers of the deeper (trainable) half in training mode; see docs/choices.md.
TRAIN_BATCHNORM = True
# The frozen-feature cache holds the cut layer's output for every training and validation image;
# above this size (every paper backbone at 224 px on the paper's 10,176 Transition slices: 3.8 to
# 7.6 GiB) it lives in a memory-mapped file on disk instead of RAM, as fast to train from
# (docs/benchmarks.md); COVID-CT's sets (at most 0.4 GiB) stay in memory.
FROZEN_CACHE_MAX_BYTES = 2 * 1024**3
# The lung window for DICOM: Transition slices and DICOM requests to the served model.
WINDOW_WIDTH = 1500.0
WINDOW_LEVEL = -600.0
SEED = 0
N_BOOTSTRAP = 1000
CONFIDENCE = 0.95
THRESHOLD = 0.5
SPLIT = "official"
BACKBONE = "mobilenet_025"
WEIGHTS = "imagenet"
EXPERIMENT_NAME = "mstl"
# Local, git-ignored working folders: exports of prepare_transition, feature cache and Optuna
# storage.
EXPORT_DIR = ".cache/exports"
CACHE_DIR = ".cache"
# The paper's grid of cluster counts for the soft labels.
K_VALUES = "2,4,8,16"
DATA_ROOT = "data"
