"""An example of a researcher's own package: a new objective and a new backbone for selfflow,
registered with gin in their own modules (docs/extending.md walks through it)."""
