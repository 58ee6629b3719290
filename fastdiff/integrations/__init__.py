"""Integrations with other libraries. Each submodule imports its library lazily: importing
fastdiff never imports diffusers."""
