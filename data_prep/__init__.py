"""Data preparation: images -> quantized byte sequences in webdataset shards, and the reader for them.

Public surface (see README): ``data_prep.prepare`` / ``data_prep.verify`` command lines,
``data_prep.manifest.load_manifest``, ``data_prep.codec.encode_images`` / ``decode_sequences``,
``data_prep.reader.train_batches`` / ``eval_batches`` / ``read_samples``.
"""
