"""Combining frozen task deltas (AdapterFusion, merges, mixed-task batches).

Not built yet: this package is reserved for the fusion issue. Layer-wise deltas already expose
what fusion needs: ``SiteDelta.contribution(site, x, h)`` gives each delta's additive output.
"""
