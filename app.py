"""mixoff: a Gradio chat with Mixtral-8x7B whose experts are offloaded to host RAM, and a live view of
the GPU expert cache. ``python app.py --help`` lists the flags; on a Hugging Face Space this file is the
entry point (README front matter: ``sdk: gradio``, ``app_file: app.py``)."""
from mixoff_app.ui.launch import main

if __name__ == "__main__":
    main()
