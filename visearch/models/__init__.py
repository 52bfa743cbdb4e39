"""The model layer without torch: the meta record of a model version (`record.ModelRecord`, the
meta.json schema), the model repository on disk (`repository`: versions, config.pbtxt, atomic
writes) and the embedder's served contract (`contract`: names, `EmbedderConfig`, its Triton config).

Serving, evaluation and the build read and write models through it; the torch modules that make
the graphs live in `visearch.modeling`, training in `visearch.training`, and `visearch.building`
(`visearch models build`) drives both.
"""

from .record import ModelRecord

__all__ = ["ModelRecord"]
