"""Tools around a merged model: routing reports, evaluation, verification, the generation engine, serve and chat."""
