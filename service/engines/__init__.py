"""Models: the engine protocol, checkpoints and tokenizers, the torch and CTranslate2 engines,
conversion, manifests, fetching and tiny checkpoints for tests."""
