"""Corpus KLD: llama.cpp-style teacher-forced scoring, base files, Ray."""
