"""foveal inside other libraries' models: ``transformers`` (an attention backend) and ``timm``.

Each integration imports its library lazily; foveal itself never requires them.
"""
