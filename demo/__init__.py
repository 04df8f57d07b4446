"""The Gradio demo (see demo/app.py)."""
