"""Data: any source in the Oxford layout into checked, content-hashed TFRecord shards, split by the md5
(or official) rule, read back as ``tf.data``."""
