"""A procedural MVTec-format dataset: the stand-in for MVTec AD in the tests and the demo.

No downloads exist here, so the project renders its own benchmark. Every image is drawn from a seed,
with smooth shading, a soft shadow, slight lighting drift and sensor noise; defects vary in size,
contrast and placement (some are faint), so three examples do not make detection trivial.

Categories (``dualanodiff synth OUT`` writes all of them):

=========  =======  ==========================================================================  ==========================================
category   kind     normal images                                                               defect types
=========  =======  ==========================================================================  ==========================================
``nut``    object   a round, nut-like body with radial grain and a lit top, on plain paper;     ``scratch`` (thin curved line, light or
                    random size, aspect, rotation, position and brown tone                      dark), ``hole`` (dark pit with a rim),
                                                                                                ``crack`` (jagged branching dark line),
                                                                                                ``stain`` (soft irregular colour blot)
``pill``   object   an elongated two-colour capsule at any rotation on a plain background;      ``scratch``, ``missing_piece`` (a chunk
                    random length, width, colours and position                                  bitten out of the rim: background shows),
                                                                                                ``stain``
``weave``  texture  a woven fabric (plain weave) filling the frame; random thread period,       ``hole`` (threads gone, dark backing
                    angle, phase and yarn colours                                               shows), ``cut`` (thin straight slit),
                                                                                                ``stain``, ``thread`` (one loose thread
                                                                                                in a wrong colour)
=========  =======  ==========================================================================  ==========================================

Beyond these three benchmark categories (``CATEGORIES``, what ``write_dataset`` writes by default), the
*pretraining world* (``FAMILIES``) holds further objects (``screw``, ``washer``, ``gear``, ``chip``,
``tablet``, ``bottle``) and textures (``grid``, ``wood``, ``tile``, ``leather``, ``carpet``), and a larger
defect vocabulary (``contamination``, ``bent``, ``misprint``, ``fold``, ``color``, ``glue`` besides the
above), each with varied size, contrast and placement. ``HELD_OUT`` (``bottle``) is never shown to the
embedded base in pretraining; ``write_dataset(root, categories=[HELD_OUT])`` writes it for a demo on a
category the base has not seen. ``world_item`` draws the base's training images: normal, defective,
defect-only part images and backgrounds (``WORLD_KINDS``), captioned as the few-shot prompts read.

Masks mark exactly the altered pixels: a defect is rendered only inside its mask, and every pixel
inside the mask differs from the defect-free render of the same scene (``Sample.clean``). Object
defects lie on the object. The files are byte-identical for a seed; each image has its own seed
derived from (seed, category, split, defect, index), so changing ``--per-defect`` does not change
the images that were already there.

Layout written (MVTec AD)::

    OUT/<category>/train/good/000.png
    OUT/<category>/test/good/000.png
    OUT/<category>/test/<defect>/000.png
    OUT/<category>/ground_truth/<defect>/000_mask.png     (L, 0/255)

Example::

    rng = np.random.default_rng(0)
    sample = render_sample("nut", "crack", rng, 128)
    assert (sample.mask == (sample.image != sample.clean).any(-1)).all()

Modules: ``draw`` (the drawing primitives), ``scenes`` (one renderer per family's normal images),
``defects`` (one painter per defect type), ``dataset`` (the categories, one sample's render and the MVTec
writer), ``world`` (the pretraining world's images and captions).
"""

from dualanodiff.synthetic.dataset import (
    CATEGORIES,
    FAMILIES,
    HELD_OUT,
    PRETRAIN_FAMILIES,
    dataset_jobs,
    render_defect,
    render_normal,
    render_sample,
    write_dataset,
)
from dualanodiff.synthetic.world import (
    GREY,
    WORLD_KINDS,
    WORLD_MIX,
    background_image,
    part_image,
    thing_name,
    world_item,
    world_words,
)

__all__ = [
    "CATEGORIES", "FAMILIES", "GREY", "HELD_OUT", "PRETRAIN_FAMILIES", "WORLD_KINDS", "WORLD_MIX",
    "background_image", "dataset_jobs", "part_image", "render_defect", "render_normal",
    "render_sample", "thing_name", "world_item", "world_words", "write_dataset",
]
