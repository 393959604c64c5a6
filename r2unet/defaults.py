"""The defaults the package shares, each stated once: ``engine.config.TrainConfig`` declares the settings with them,
and the networks, the library's functions and the commands' flags take them from here. No imports: everything may
read it, ``r2unet --help`` included."""

MODEL_TYPE = "R2U_Net"  # the network the reference trains by default
# Recurrence steps of R2U-Net and Attention R2U-Net: 3, the reference's training default (its main.py --t), which
# trained the reference checkpoints users bring. (Its network constructors default to 2, as the R2U-Net paper used;
# pass t=2 / --t 2 for that.)
T = 3
BASE_CHANNELS = 64  # width of the first stage: the reference's networks
IMAGE_SIZE = 224  # the square size the network sees: the reference's
BATCH_SIZE = 16  # images per step and process, in training and evaluate
# images per forward pass in predict and serve: 8 on a GPU; 1 on a CPU, where a smaller batch stays in the caches (an
# R2U-Net forward at 224 px: 0.84 img/s at batch 1 against 0.68 at batch 8 in float32, 4.8 against 3.4 in bf16 with
# channels_last; benchmarks/README.md, "bench predict")
PREDICT_BATCH, PREDICT_BATCH_CPU = 8, 1
THRESHOLD = 0.5  # probability above which a pixel is foreground

# Named sets of training settings (``train --preset``; flags given win). laptop: a small R2U-Net that a 2-core CPU
# trains at 41 s per 1,000 training images and epoch in bf16 (AMX) and 94 s in float32, with per-step BatchNorm
# statistics (test JS 0.962 against 0.924 with shared ones, on 400 synthetic lesions; benchmarks/README.md,
# "Training presets"), ending with a checked int8 model for predict and serve on a CPU (used only where its masks
# match float32's on 99.9 % of the pixels; on one such run they did not); gpu: the reference's recipe, with the
# mixed precision and compilation a GPU run takes by default.
PRESETS = {
    "laptop": {"model_type": MODEL_TYPE, "t": 2, "base_channels": 16, "image_size": 128, "batch_size": 8,
               "num_epochs": 30, "num_epochs_decay": 12, "lr": 1e-3, "beta1": 0.9, "step_stats": True,
               "int8": "on"},
    "gpu": {"model_type": MODEL_TYPE, "t": T, "base_channels": BASE_CHANNELS, "image_size": IMAGE_SIZE,
            "batch_size": BATCH_SIZE, "num_epochs": 150, "num_epochs_decay": 70},
}
