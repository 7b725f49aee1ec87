"""VRAM placement: read a GGUF's header, estimate memory per device the way llama.cpp
allocates it, and choose GPUs, ``-ngl``, ``--tensor-split`` and ``-c`` for each instance.

Modules: ``gguf_info`` (model facts and tensor sizes), ``settings`` (launch flags as
llama.cpp resolves them), ``kv_cache`` and ``compute`` (the two context-dependent parts),
``estimate`` (per-device bytes), ``planner`` (pure packing decisions), ``measured`` (what
llama-server reports), ``fit_check`` (llama-fit-params), ``cli`` (``analyze``, ``plan``).
"""
