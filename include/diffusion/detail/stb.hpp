#pragma once

// The stb libraries (Debian's libstb-dev) this library uses, each implemented here with every function
// static, so any number of translation units can include them: stb_image_write (PNG), stb_image (PNG,
// JPEG, BMP) and stb_image_resize (the image folder's area filter). A program that already includes
// stb_image.h itself keeps its own (and must provide its implementation).
#ifndef STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_WRITE_STATIC
#if __has_include(<stb/stb_image_write.h>)
#include <stb/stb_image_write.h>
#else
#include <stb_image_write.h>
#endif
#endif
#ifndef STBI_INCLUDE_STB_IMAGE_H
#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_STATIC
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
#if __has_include(<stb/stb_image.h>)
#include <stb/stb_image.h>
#else
#include <stb_image.h>
#endif
#endif
#ifndef STBIR_INCLUDE_STB_IMAGE_RESIZE_H
#define STB_IMAGE_RESIZE_IMPLEMENTATION
#define STB_IMAGE_RESIZE_STATIC
#if __has_include(<stb/stb_image_resize.h>)
#include <stb/stb_image_resize.h>
#else
#include <stb_image_resize.h>
#endif
#endif
