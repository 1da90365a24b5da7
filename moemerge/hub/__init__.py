"""The Hugging Face Hub in both directions: fetching the inputs a recipe names, pushing a merged model."""
