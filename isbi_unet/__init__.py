"""Library code behind the top-level scripts of the ISBI 2012 U-Net.

Framework-free core (NumPy, OpenCV, matplotlib; no OneFlow import, so tools/ can run it under PyTorch):
    errors     the `error: PATH: problem` / exit 2 convention, warnings, output-folder checks
    images     reading, checking, writing and standardising slices and labels; splits; the 8 symmetries
    dataset    `Slices`: the training pairs in memory, with the paper's augmentation and random crops
    augment    elastic deformation, intensity jitter, border weight maps
    tiling     overlap-tile inference, test-time augmentation, the ISBI submission TIFF
    blocks     the blocks of a slice that reproduce the whole-image pass: geometry, halo, slice statistics
    volume     blockwise prediction of any size: sources, sinks, journal, executors (volume_bench: its benchmark)
    metrics    V_rand, V_info and pixel error as the challenge scores them
    figures    loss curves and figure files
    process    process life behind one door (start_up, run_main, session, signals_held), importing nothing
               else of the repo: runtime (who this process is, exit codes, joining the job under a deadline),
               interrupt (Ctrl-C and SIGTERM), watchdog (a stalled job), launch (OneFlow's launcher, Ctrl-C
               passed on)
    flags      every script's command line: one spelling declared, defaults in --help, ranges, one-line errors;
               and the settings schema (`setting`, `parser_for`, `parse`)
    outputs    who may write where: records of what a script wrote, --overwrite
    predictor  one model or an ensemble (checkpoints, ONNX files, bioimage.io packages) behind one call
    onnx_backend, bioimageio   ONNX Runtime inference; bioimage.io packages

OneFlow side:
    device     which device, how many processes
    losses     BCE and BCE + soft Dice
    engine     eager and nn.Graph training and inference behind one interface
    training   one epoch, precise BatchNorm, validation, the run's log
    checkpoint kill-safe checkpoints that rebuild their own model
    record     versions, device, commit and command: what produced a result
    recipes    the cpu and full recipes, chosen by device
    train_settings  TrainUnetDataSet.py's settings, declared once
    run_dir    a training run's folder: its config, log and checkpoints
"""
