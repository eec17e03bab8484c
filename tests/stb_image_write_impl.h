/* stb_image_write (Debian's libstb-dev) compiled into the C test that includes this header, once
 * per test executable, for the tests that generate image files; its own code's warnings are
 * silenced. */
#ifndef TF_TESTS_STB_IMAGE_WRITE_IMPL_H
#define TF_TESTS_STB_IMAGE_WRITE_IMPL_H

#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBIW_ASSERT(x) ((void)0)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#include <stb/stb_image_write.h>
#pragma GCC diagnostic pop

#endif
