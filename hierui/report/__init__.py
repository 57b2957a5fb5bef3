"""`hierui report`: the HTML page, its sentences and charts."""
