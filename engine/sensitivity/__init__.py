"""Per-unit sensitivity (`hierui sensitivity`): the corpus KLD of perturbing ONE unit of the model (a decoder layer,
its attention or its MLP, or one weight matrix) while everything else stays dense, in `hierui kld`'s windows and
statistics.

    units.py     the units of a model (layer, sublayer, matrix) and which weight matrices each holds
    levels.py    which specs can be measured per unit, and the levels (--sparsities) of one
    swap.py      a unit's perturbed tensors (or quantized modules) put into the dense model, and taken out again
    dense.py     the dense side, once: each window's head inputs and the decoder layers' inputs, layer by layer
    measure.py   the units of one level scored from the cached dense input of their layer
    folder.py    OUT: sensitivity.json (same run or refuse), the rows appended as they finish, the tables
    run.py       the whole run: levels × units, resumed from OUT

No UI here: hierui.cli.sensitivity declares the command, hierui.views.sensitivity prints the table.
"""
