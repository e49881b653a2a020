"""Hugging Face interoperability: export to `transformers` Llama + extra heads, import a Llama to continue with MTP.

Trunk + head 1 + the shared final norm and unembedding of a transformer-head
(or sequential-head) MTP model is exactly a `LlamaForCausalLM` with
`trunk_layers + 1` decoder layers; heads 2..n are more decoder layers on the
trunk output. The modules:

- `shape`: a Hugging Face `config.json` -> our model shape, torch-free (config time);
- `mapping`: tensor names and layouts, MTPModel <-> Llama (fused QKV, gate/up);
- `tokenizer`: our tokenizers as `AutoTokenizer` files, and a Hugging Face
  model directory's tokenizer as ours;
- `export`: `mtp export --format hf`;
- `load`: `model.init_from=hf:DIR` (the logical state of a Llama checkpoint,
  written into a freshly built model of any layout);
- `modeling_mtp_llama`: the `trust_remote_code` model copied into every export.

See docs/huggingface.md.
"""
