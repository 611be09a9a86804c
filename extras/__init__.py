"""The extras: each module adds one feature around the core (train.py, engine.py, models.py, transforms.py, utils.py,
datasets/), which imports it only where a flag asks for it. Delete a module and that one call, and the rest runs
without it. Extras import the core, never the reverse. README's Layout section lists them.
"""
