"""What the node reports to the edge proxy: GPU samples, instance changes and sleep cycles.

``buffer`` (the bounded, numbered ring of records not yet stored), ``convert`` (pure: the
agent's observations as wire records), ``client`` (the POST), ``service`` (the component).
"""
