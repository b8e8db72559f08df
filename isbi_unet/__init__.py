"""Library code behind the top-level scripts of the ISBI 2012 U-Net.

Framework-free core (NumPy, OpenCV, matplotlib; no OneFlow import, so tools/ can run it under PyTorch):
    errors     the `error: PATH: problem` / exit 2 convention, warnings, output-folder checks
    images     reading, checking, writing and standardising slices and labels; splits; the 8 symmetries
    dataset    `Slices`: the training pairs in memory, with the paper's augmentation and random crops
    augment    elastic deformation, intensity jitter, border weight maps
    tiling     overlap-tile inference, test-time augmentation, the ISBI submission TIFF
    metrics    V_rand, V_info and pixel error as the challenge scores them
    figures    loss curves and figure files
    lifeline   ties a rank to its launcher's life

OneFlow side:
    device     which device, how many processes
    losses     BCE and BCE + soft Dice
    engine     eager and nn.Graph training and inference behind one interface
    training   one epoch, precise BatchNorm, validation, the run's log
    checkpoint kill-safe checkpoints that rebuild their own model
    record     versions, device, commit and command: what produced a result
"""
