"""Ensemble engine: pure voting rules, metrics and statistics (`voting`, `metrics`, `stats`)
plus the stateful store/selection/evaluation layers that call them.

Deliberately import-free so sibling modules can import each other without cycles."""
