"""``python -m lib.dicom INPUT OUTPUT_DIR``: the command of :mod:`lib.pipeline.dicom`, its home."""

if __name__ == "__main__":
    from lib.pipeline.dicom import main

    main()
