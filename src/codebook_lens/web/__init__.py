"""The code browser: a web app and JSON API over a code cache (``codebook serve``);
``create_app`` builds the app."""

from codebook_lens.web.app import create_app

__all__ = ["create_app"]
