"""Attention over a device mesh: ring attention, Ulysses all-to-all, the sequence-parallel front end and context-parallel decoding."""
