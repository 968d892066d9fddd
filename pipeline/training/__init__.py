"""U-Net training: patch data and augmentation, distributed set-up, the epoch loop."""
