"""Training libraries on the ring: ``accelerate`` (``ringcompile.integrations.accelerate``:
``RingAccelerator``) and transformers' ``Trainer`` (``ringcompile.integrations.transformers``:
``RingTrainer``).

Each module imports its library, so import the one you use; neither library is a dependency of
ringcompile itself.
"""
