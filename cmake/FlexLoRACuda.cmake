# FlexLoRA CUDA backend: csrc/cuda/ + bindings/cuda_bindings.cpp -> the module server._cuda.
#
# Included by CMakeLists.txt inside `if(FLEXLORA_CUDA)`, after the flexlora_cpu target and
# pybind11 exist. The CPU module server._core never links CUDA; _cuda is a separate module.
#
# cuBLAS and cuSOLVER come from the PyPI wheels (nvidia-cublas, nvidia-cusolver; the layout
# site-packages/nvidia/cu13/{include,lib} or the older nvidia/<lib>/{include,lib}) when the
# build's Python has them, else from a full CUDA toolkit. The module finds them at run time
# through RPATH: relative to site-packages for an installed wheel ($ORIGIN/../nvidia/...),
# plus the absolute directories found at build time for in-place and editable builds.
#
# Cache variables: CMAKE_CUDA_ARCHITECTURES (default "90-real;75-virtual": H100 machine code
# plus PTX that any newer GPU JIT-compiles), FLEXLORA_CUDA_LIB_DIRS / FLEXLORA_CUDA_INCLUDE_DIRS
# (extra places to look for cuBLAS/cuSOLVER).
include_guard(GLOBAL)

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES "90-real;75-virtual" CACHE STRING "CUDA targets" FORCE)
endif()
if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
  find_program(_flexlora_nvcc nvcc HINTS "$ENV{CUDA_HOME}/bin" /usr/local/cuda/bin)
  if(_flexlora_nvcc)
    set(CMAKE_CUDA_COMPILER "${_flexlora_nvcc}" CACHE FILEPATH "nvcc" FORCE)
  endif()
endif()
enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
find_package(CUDAToolkit REQUIRED)

# ---- cuBLAS / cuSOLVER: ask the build's Python where the nvidia wheels put them.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c [=[
import os, site, sys
roots = []
try:
    import nvidia
    roots += list(nvidia.__path__)
except Exception:
    pass
roots += [os.path.join(p, "nvidia") for p in site.getsitepackages() + [site.getusersitepackages()]]
seen = []
for root in roots:
    if not os.path.isdir(root) or root in seen:
        continue
    seen.append(root)
    for sub in sorted(os.listdir(root), reverse=True):   # cu13 before cu12, then per-lib dirs
        base = os.path.join(root, sub)
        inc, lib = os.path.join(base, "include"), os.path.join(base, "lib")
        if os.path.isdir(inc) and os.path.isdir(lib):
            rel = os.path.relpath(lib, os.path.dirname(root))
            print(f"{inc}|{lib}|{rel}")
]=]
  OUTPUT_VARIABLE _flexlora_wheel_dirs
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _flexlora_wheel_rc)
set(_flexlora_wheel_inc "")
set(_flexlora_wheel_lib "")
set(_flexlora_wheel_rel "")
if(_flexlora_wheel_rc EQUAL 0 AND _flexlora_wheel_dirs)
  string(REPLACE "\n" ";" _flexlora_wheel_dirs "${_flexlora_wheel_dirs}")
  foreach(_line IN LISTS _flexlora_wheel_dirs)
    string(REPLACE "|" ";" _parts "${_line}")
    list(GET _parts 0 _i)
    list(GET _parts 1 _l)
    list(GET _parts 2 _r)
    list(APPEND _flexlora_wheel_inc "${_i}")
    list(APPEND _flexlora_wheel_lib "${_l}")
    list(APPEND _flexlora_wheel_rel "${_r}")
  endforeach()
endif()

set(FLEXLORA_CUDA_INCLUDE_DIRS "" CACHE STRING "Extra include dirs for cuBLAS/cuSOLVER")
set(FLEXLORA_CUDA_LIB_DIRS "" CACHE STRING "Extra library dirs for cuBLAS/cuSOLVER")
set(_flexlora_inc_hints ${FLEXLORA_CUDA_INCLUDE_DIRS} ${_flexlora_wheel_inc} ${CUDAToolkit_INCLUDE_DIRS})
set(_flexlora_lib_hints ${FLEXLORA_CUDA_LIB_DIRS} ${_flexlora_wheel_lib} ${CUDAToolkit_LIBRARY_DIR})
set(_flexlora_major "${CUDAToolkit_VERSION_MAJOR}")

function(_flexlora_find_cuda_lib var header names)
  find_path(${var}_INCLUDE_DIR ${header} HINTS ${_flexlora_inc_hints} NO_DEFAULT_PATH)
  find_path(${var}_INCLUDE_DIR ${header} HINTS ${_flexlora_inc_hints})
  find_library(${var}_LIBRARY NAMES ${names} HINTS ${_flexlora_lib_hints} NO_DEFAULT_PATH)
  find_library(${var}_LIBRARY NAMES ${names} HINTS ${_flexlora_lib_hints})
  if(NOT ${var}_INCLUDE_DIR OR NOT ${var}_LIBRARY)
    message(FATAL_ERROR "FLEXLORA_CUDA=ON: ${header} / ${names} not found. Install the wheels "
                        "(pip install nvidia-cublas nvidia-cusolver, matching CUDA "
                        "${CUDAToolkit_VERSION}) or a full CUDA toolkit, or set "
                        "FLEXLORA_CUDA_INCLUDE_DIRS / FLEXLORA_CUDA_LIB_DIRS.")
  endif()
  message(STATUS "FlexLoRA CUDA: ${header} in ${${var}_INCLUDE_DIR}, library ${${var}_LIBRARY}")
endfunction()

# The wheels ship only versioned sonames (libcublas.so.13), so name those too.
_flexlora_find_cuda_lib(FLEXLORA_CUBLAS cublas_v2.h
  "cublas;libcublas.so.${_flexlora_major};libcublas.so.13;libcublas.so.12")
_flexlora_find_cuda_lib(FLEXLORA_CUSOLVER cusolverDn.h
  "cusolver;libcusolver.so.12;libcusolver.so.11")

if(NOT TARGET FlexLoRA::cublas)
  add_library(FlexLoRA::cublas SHARED IMPORTED)
  set_target_properties(FlexLoRA::cublas PROPERTIES
    IMPORTED_LOCATION "${FLEXLORA_CUBLAS_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${FLEXLORA_CUBLAS_INCLUDE_DIR}")
  add_library(FlexLoRA::cusolver SHARED IMPORTED)
  set_target_properties(FlexLoRA::cusolver PROPERTIES
    IMPORTED_LOCATION "${FLEXLORA_CUSOLVER_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${FLEXLORA_CUSOLVER_INCLUDE_DIR}")
endif()

# ---- the backend library and the module.
file(GLOB FLEXLORA_CUDA_SOURCES CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/csrc/cuda/*.cu")
if(NOT FLEXLORA_CUDA_SOURCES)
  message(FATAL_ERROR "FLEXLORA_CUDA=ON but csrc/cuda/ has no .cu sources")
endif()
add_library(flexlora_cuda STATIC ${FLEXLORA_CUDA_SOURCES})
target_include_directories(flexlora_cuda PUBLIC "${PROJECT_SOURCE_DIR}/csrc/cuda")
# cudart is linked statically (CMake's default for CUDA); cuBLAS/cuSOLVER are shared and are
# the same sonames torch loads, so one copy of each ends up in the process.
target_link_libraries(flexlora_cuda PUBLIC flexlora_cpu FlexLoRA::cusolver FlexLoRA::cublas
                                           CUDA::cudart_static)
set_target_properties(flexlora_cuda PROPERTIES POSITION_INDEPENDENT_CODE ON
                                               CUDA_RUNTIME_LIBRARY Static)
target_compile_options(flexlora_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall>)

pybind11_add_module(_cuda MODULE "${PROJECT_SOURCE_DIR}/bindings/cuda_bindings.cpp")
target_link_libraries(_cuda PRIVATE flexlora_cuda)

set(_flexlora_rpath "$ORIGIN/../scipy_openblas32/lib")
foreach(_rel IN LISTS _flexlora_wheel_rel)
  list(APPEND _flexlora_rpath "$ORIGIN/../${_rel}")
endforeach()
get_filename_component(_cublas_dir "${FLEXLORA_CUBLAS_LIBRARY}" DIRECTORY)
get_filename_component(_cusolver_dir "${FLEXLORA_CUSOLVER_LIBRARY}" DIRECTORY)
list(APPEND _flexlora_rpath "${_cublas_dir}" "${_cusolver_dir}" "${FLEXLORA_OPENBLAS_LIB_DIR}")
list(REMOVE_DUPLICATES _flexlora_rpath)
set_target_properties(_cuda PROPERTIES INSTALL_RPATH "${_flexlora_rpath}"
                                       BUILD_WITH_INSTALL_RPATH ON)
install(TARGETS _cuda LIBRARY DESTINATION server)
message(STATUS "FlexLoRA CUDA: architectures ${CMAKE_CUDA_ARCHITECTURES}, RPATH ${_flexlora_rpath}")
