"""Architecture flags as layers/options of the models (DESIGN.md section 7): one module each."""
