"""trainer: train small students from a feature store, without the teacher."""
