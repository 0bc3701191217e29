"""Data-side optimisation flags: which training windows the trainer feeds, and in what order.

- :mod:`.curriculum` (``use_curriculum``): easy-to-hard pacing by a training-split difficulty score;
- :mod:`.active_learning` (``use_active_learning``): online batch selection by the model's loss;
- :mod:`.target`: time to a target validation perplexity, which both flags record.
"""
