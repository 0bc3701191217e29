"""Architecture flags as layers/options of the models (docs/flags.md): one module each."""
