/* The native kernel's one translation unit (runtime/native.py compiles this file alone): every family of
 * kernel/ in the order kernel/pvq.h describes, so that each hot static inline helper is inlined where it is
 * used. */
#include "kernel/pvq.h"

#include "kernel/plan.c"
#include "kernel/fixed.c"
#include "kernel/lut.c"
#include "kernel/uniform.c"
#include "kernel/rotate.c"
#include "kernel/dense16.c"
#include "kernel/actsearch.c"
#include "kernel/search.c"
#include "kernel/linear.c"
#include "kernel/checks.c"
