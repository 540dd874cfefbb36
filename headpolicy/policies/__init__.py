"""Policies: the HeadPolicy schema, selection from scores, bundled policy files."""
