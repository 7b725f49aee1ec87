"""What the node reports to the edge proxy: GPU samples, busy spans per GPU, instance changes
and sleep cycles.

``buffer`` (the bounded, numbered ring of records not yet stored), ``convert`` (pure: the
agent's observations as wire records), ``busy`` (pure: when each GPU had a task, as closed
spans), ``client`` (the POST), ``service`` (the component).
"""
