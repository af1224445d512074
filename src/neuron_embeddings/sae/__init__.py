"""Sparse autoencoders (SAEs) on a layer's MLP activations, and their latents as units of the neuron-embedding method.

An SAE reads h, the layer's MLP activations (`blocks.{L}.mlp.hook_post`: the neuron activations, the input of the
output projection), and writes a reconstruction of it:

    x   = h - b_dec                       (the SAE's input, "h minus the decoder bias"; SAELens apply_b_dec_to_input)
    pre = x @ W_enc + b_enc               (latent pre-activations; W_enc [d_in, d_sae])
    f   = act(pre)                        (ReLU; TopK: the k largest per token, ReLU'd; JumpReLU: pre where pre > theta)
    h^  = f @ W_dec + b_dec               (W_dec [d_sae, d_in], rows of unit norm for the SAEs trained here)

A latent is a unit exactly like a neuron: its MLP input is x, its input weights W_enc[:, f], its bias b_enc[f], so
its embedding at an example is x * W_enc[:, f] and sum(embedding) + b_enc[f] is the latent's pre-activation. The
selection, embedding, clustering and metrics code of the neurons runs unchanged on latents.

One module per thing a workflow stage runs, so that a stage's code hash (codehash.py) covers what it executes and
nothing else; this file imports nothing, so importing one module does not load the others:

- `config`: which SAEs a run has (config key `sae`), read while the Snakefile is parsed (no torch);
- `model`: the SAE itself (`SparseAutoencoder`) and the check that it fits a layer;
- `saelens_io`: the SAELens layout (cfg.json + sae_weights.safetensors): load, save, import an external SAE;
- `streaming`: what training, caching and evaluation share: the language model up to a layer, held-out windows;
- `training`: training a ReLU (L1) or TopK SAE on activations streamed from the model (`train_sae`);
- `latents`: the latents through the neurons' caching (pass-1 statistics and selected examples);
- `embedding`: the latents' embeddings (the neurons' embedding stage with the encoder as input weights);
- `evaluation`: the quality figures (FVE, L0, dead latents, the LM loss with the reconstruction spliced in);
- `comparison`: the layer's neurons against the SAE's latents, with bootstrap intervals (JSON);
- `plots`: the comparison's plot.
"""
