"""`python3 -m isbi_unet.launch`: OneFlow's launcher with Ctrl-C passed on (isbi_unet/process/launch.py)."""

from isbi_unet.process.launch import main

if __name__ == "__main__":
    main()
