"""Generation with MTP models: KV-cached decoding and self-speculative decoding with the extra heads.

`decode.Decoder` is the entry point; `mtp generate` and `mtp bench speculative`
(`cli.py`) wrap it. See docs/generation.md.
"""
