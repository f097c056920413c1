"""Loading models: the encoder, the one LM loader (lm.py), generators, the name registry, quantisation.

sentence-transformers and peft import bitsandbytes, which logs at import time; its log filters are set here,
where ragkit's model code is first imported, before any of them loads (ragkit.models.lm.quiet_bitsandbytes)."""

from ragkit.models.lm import quiet_bitsandbytes

quiet_bitsandbytes()
