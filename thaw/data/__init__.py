"""Datasets: sources, validation, split, and the prepared (decoded, resized, sharded) format.

Modules: `sources` (list a folder, S3 prefix or idx files), `images` (decode, resize),
`split` (stratified, duplicate-aware), `prepare` (`prepare_dataset`), `prepared`
(`open_prepared`, `ImageSplit`), `fashion_mnist` (idx reader, sample export).
Nothing is imported here so that decoding worker processes start without torch.
"""
