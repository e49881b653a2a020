"""The MTP model on megatron-core.

Import from the submodules (`pretrain.model.mtp.MTPModel`,
`pretrain.model.counting.param_counts`, ...): this package file stays empty
so that `pretrain.model.config` loads without torch or megatron.
"""
