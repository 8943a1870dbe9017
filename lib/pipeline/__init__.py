"""The model pipeline: everything between a scan and its label map, shared by the server's
tasks and the offline commands.

``labels`` (the label table), ``plans`` (every setting of the network and its data, ``--conf``),
``io`` (reading, checking, atomic writing), ``errors`` (errors with their HTTP status),
``transforms`` (the pre/post chains of every stage), ``networks`` (SwinUNETR 3D and the
2.5D sagittal-slab network, loading with plan checks), ``losses``, ``metrics`` (the one Dice),
``grouping`` (label decision by structure kind), ``postprocess`` (clean-up of islands),
``levels`` (level assignment and its report), ``dicom`` (DICOM series and SEG writing).
"""
