"""ImageNet-1k -> Pascal VOC class mapping used by the ``imagenet`` head of :mod:`gradloc.models`.

Each VOC class is a group of ImageNet-1k class indices (the standard ILSVRC-2012 order used by torchvision,
timm and every ImageNet checkpoint). The ``imagenet`` head scores a VOC class by the summed softmax
probability of its group,

    p(c | x) = sum_{i in G_c} softmax(z)_i,        CAM target s_c = log p(c | x)
             = logsumexp_{i in G_c} z_i - logsumexp_{j=1..1000} z_j,

so every group must be non-empty (an empty group would give s_c = -inf and NaN gradients).

How good the mapping is differs by class -- read this before interpreting per-class numbers:

* **exact or nearly exact**: cat, dog, bird (every ImageNet bird synset), diningtable ("dining table"),
  bus, aeroplane, train, car (whole-vehicle synsets only), boat, motorbike.
* **approximate**: bottle (five bottle kinds), chair (four chair kinds; no plain "chair"), cow (ox, water
  buffalo, bison), sheep (ram, bighorn), horse (sorrel, horse cart), sofa ("studio couch" only),
  pottedplant ("pot", i.e. flowerpot), tvmonitor (monitor, screen, television, desktop computer),
  bicycle (two bicycle kinds).
* **person has no ImageNet-1k counterpart.** ImageNet-1k has no "person" class; the group holds the three
  person synsets it does have ("ballplayer", "groom", "scuba diver"). Their summed probability is small on
  most photographs of people, so the person score of the ``imagenet`` head is close to meaningless as a
  classifier and its heatmaps explain "a ballplayer/groom/diver" -- report person results of this head
  with that caveat, or use a trained ``voc`` head.

Groups are disjoint. Every entry is written as ``(index, ImageNet class name)``; the names are the short
names of torchvision's ImageNet category list and are checked against it by the tests, so an index typo
cannot go unnoticed.
"""

from __future__ import annotations

IMAGENET_VOC_GROUPS: dict[str, tuple[tuple[int, str], ...]] = {
    # Aircraft: the two aeroplane synsets plus "wing" (an aeroplane wing seen from a window).
    # Not "airship" (405), "space shuttle" (812) or "plane" (726, a carpenter's plane).
    "aeroplane": ((404, "airliner"), (895, "warplane"), (908, "wing")),
    # Bicycles. "tricycle" (870) and "unicycle" (880) are left out.
    "bicycle": ((444, "bicycle-built-for-two"), (671, "mountain bike")),
    # Every bird synset: 7-24 (fowl, finches, raptors, owl), 80-100 (game birds, parrots, water fowl),
    # 127-146 (storks, herons, waders, pelican, penguin, albatross).
    "bird": (
        (7, "cock"), (8, "hen"), (9, "ostrich"), (10, "brambling"), (11, "goldfinch"), (12, "house finch"),
        (13, "junco"), (14, "indigo bunting"), (15, "robin"), (16, "bulbul"), (17, "jay"), (18, "magpie"),
        (19, "chickadee"), (20, "water ouzel"), (21, "kite"), (22, "bald eagle"), (23, "vulture"),
        (24, "great grey owl"),
        (80, "black grouse"), (81, "ptarmigan"), (82, "ruffed grouse"), (83, "prairie chicken"),
        (84, "peacock"), (85, "quail"), (86, "partridge"), (87, "African grey"), (88, "macaw"),
        (89, "sulphur-crested cockatoo"), (90, "lorikeet"), (91, "coucal"), (92, "bee eater"),
        (93, "hornbill"), (94, "hummingbird"), (95, "jacamar"), (96, "toucan"), (97, "drake"),
        (98, "red-breasted merganser"), (99, "goose"), (100, "black swan"),
        (127, "white stork"), (128, "black stork"), (129, "spoonbill"), (130, "flamingo"),
        (131, "little blue heron"), (132, "American egret"), (133, "bittern"), (134, "crane bird"),
        (135, "limpkin"), (136, "European gallinule"), (137, "American coot"), (138, "bustard"),
        (139, "ruddy turnstone"), (140, "red-backed sandpiper"), (141, "redshank"), (142, "dowitcher"),
        (143, "oystercatcher"), (144, "pelican"), (145, "king penguin"), (146, "albatross"),
    ),
    # Vessels of any size. Not "amphibian" (408, an amphibious car), "wreck" (913), "paddlewheel" (694).
    "boat": (
        (403, "aircraft carrier"), (472, "canoe"), (484, "catamaran"), (510, "container ship"),
        (554, "fireboat"), (576, "gondola"), (625, "lifeboat"), (628, "liner"), (724, "pirate"),
        (780, "schooner"), (814, "speedboat"), (833, "submarine"), (871, "trimaran"), (914, "yawl"),
    ),
    # Approximate: the five bottle kinds ImageNet has. Not jugs (899, 901).
    "bottle": (
        (440, "beer bottle"), (720, "pill bottle"), (737, "pop bottle"), (898, "water bottle"),
        (907, "wine bottle"),
    ),
    "bus": ((654, "minibus"), (779, "school bus"), (874, "trolleybus")),
    # Whole cars and vans. VOC's guidelines exclude emergency vehicles and trucks; "ambulance" and "police
    # van" are kept because their pictures are cars/vans. Left out: trucks ("tow truck" 864, "moving van"
    # 675, "trailer truck" 867), "go-kart" (573), "golfcart" (575) and car parts ("car wheel" 479,
    # "grille" 581, "car mirror" 475), which would also fire on other vehicles.
    "car": (
        (407, "ambulance"), (436, "beach wagon"), (468, "cab"), (511, "convertible"), (609, "jeep"),
        (627, "limousine"), (656, "minivan"), (661, "Model T"), (717, "pickup"), (734, "police van"),
        (751, "racer"), (817, "sports car"),
    ),
    # Domestic cats 281-285. Not "Madagascar cat" (383, a lemur) or the big cats 286-293.
    "cat": (
        (281, "tabby"), (282, "tiger cat"), (283, "Persian cat"), (284, "Siamese cat"), (285, "Egyptian cat"),
    ),
    # Approximate: ImageNet has no plain chair, only these four kinds.
    "chair": ((423, "barber chair"), (559, "folding chair"), (765, "rocking chair"), (857, "throne")),
    # Approximate: cattle-like bovines.
    "cow": ((345, "ox"), (346, "water buffalo"), (347, "bison")),
    "diningtable": ((532, "dining table"),),
    # Every dog breed 151-268 (Chihuahua ... Mexican hairless). Not wolves, foxes, wild dogs (269-280).
    "dog": tuple(
        (index, name)
        for index, name in enumerate(
            (
                "Chihuahua", "Japanese spaniel", "Maltese dog", "Pekinese", "Shih-Tzu", "Blenheim spaniel",
                "papillon", "toy terrier", "Rhodesian ridgeback", "Afghan hound", "basset", "beagle",
                "bloodhound", "bluetick", "black-and-tan coonhound", "Walker hound", "English foxhound",
                "redbone", "borzoi", "Irish wolfhound", "Italian greyhound", "whippet", "Ibizan hound",
                "Norwegian elkhound", "otterhound", "Saluki", "Scottish deerhound", "Weimaraner",
                "Staffordshire bullterrier", "American Staffordshire terrier", "Bedlington terrier",
                "Border terrier", "Kerry blue terrier", "Irish terrier", "Norfolk terrier", "Norwich terrier",
                "Yorkshire terrier", "wire-haired fox terrier", "Lakeland terrier", "Sealyham terrier",
                "Airedale", "cairn", "Australian terrier", "Dandie Dinmont", "Boston bull",
                "miniature schnauzer", "giant schnauzer", "standard schnauzer", "Scotch terrier",
                "Tibetan terrier", "silky terrier", "soft-coated wheaten terrier",
                "West Highland white terrier", "Lhasa", "flat-coated retriever", "curly-coated retriever",
                "golden retriever", "Labrador retriever", "Chesapeake Bay retriever",
                "German short-haired pointer", "vizsla", "English setter", "Irish setter", "Gordon setter",
                "Brittany spaniel", "clumber", "English springer", "Welsh springer spaniel", "cocker spaniel",
                "Sussex spaniel", "Irish water spaniel", "kuvasz", "schipperke", "groenendael", "malinois",
                "briard", "kelpie", "komondor", "Old English sheepdog", "Shetland sheepdog", "collie",
                "Border collie", "Bouvier des Flandres", "Rottweiler", "German shepherd", "Doberman",
                "miniature pinscher", "Greater Swiss Mountain dog", "Bernese mountain dog", "Appenzeller",
                "EntleBucher", "boxer", "bull mastiff", "Tibetan mastiff", "French bulldog", "Great Dane",
                "Saint Bernard", "Eskimo dog", "malamute", "Siberian husky", "dalmatian", "affenpinscher",
                "basenji", "pug", "Leonberg", "Newfoundland", "Great Pyrenees", "Samoyed", "Pomeranian",
                "chow", "keeshond", "Brabancon griffon", "Pembroke", "Cardigan", "toy poodle",
                "miniature poodle", "standard poodle", "Mexican hairless",
            ),
            start=151,
        )
    ),
    # Approximate: ImageNet's only horse is "sorrel"; "horse cart" pictures show the horse too.
    "horse": ((339, "sorrel"), (603, "horse cart")),
    # Powered two-wheelers. Not "snowmobile" (802) or "go-kart" (573).
    "motorbike": ((665, "moped"), (670, "motor scooter")),
    # NO ImageNet-1k counterpart: the only person synsets (see the module docstring).
    "person": ((981, "ballplayer"), (982, "groom"), (983, "scuba diver")),
    # Approximate: "pot" is a flowerpot (with or without its plant).
    "pottedplant": ((738, "pot"),),
    # Approximate: "ram" is the domestic sheep; "bighorn" is a wild sheep.
    "sheep": ((348, "ram"), (349, "bighorn")),
    # Approximate: "studio couch" (a sofa bed) is ImageNet's only sofa.
    "sofa": ((831, "studio couch"),),
    # Rail vehicles; "streetcar" (tram) is approximate.
    "train": (
        (466, "bullet train"), (547, "electric locomotive"), (565, "freight car"), (705, "passenger car"),
        (820, "steam locomotive"), (829, "streetcar"),
    ),
    # Approximate: screens; "desktop computer" pictures are dominated by the monitor. Not "laptop" (620).
    "tvmonitor": ((527, "desktop computer"), (664, "monitor"), (782, "screen"), (851, "television")),
}


def imagenet_groups(classes: list[str] | tuple[str, ...]) -> list[list[int]]:
    """ImageNet-1k indices of each requested VOC class, in the requested order.

    Raises:
        ValueError: a class has no ImageNet mapping (only the 20 VOC classes have one).
    """
    unknown = [name for name in classes if name not in IMAGENET_VOC_GROUPS]
    if unknown:
        raise ValueError(f"class(es) {', '.join(unknown)} have no ImageNet-1k mapping; the imagenet head "
                         f"knows only {', '.join(IMAGENET_VOC_GROUPS)} -- train a voc head "
                         "with `gradloc train`")
    return [[index for index, _ in IMAGENET_VOC_GROUPS[name]] for name in classes]
