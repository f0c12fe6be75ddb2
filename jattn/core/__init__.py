"""The seed formula and what every path shares: the single-head reference (``attention``), masks, argument checks and the normalised spec, non-finite handling."""
