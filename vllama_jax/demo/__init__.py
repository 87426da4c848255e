"""`vllama-demo`: Video-LLaMA's recipe in miniature on the synthetic audio-visual set, on a CPU.

recipe.py runs the phases (data, towers, both stages of both branches, evaluation); config.py holds
its settings (full and quick); pretrain.py pretrains the tiny stand-in towers; cli.py is the command.
"""
