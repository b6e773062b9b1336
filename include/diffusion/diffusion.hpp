#pragma once

/// The umbrella header: everything the library offers.
///
/// Example:
///   #include <diffusion/diffusion.hpp>
///   diffusion::ConvNet model;
///   diffusion::NoiseSchedule schedule;
///   auto images = diffusion::sample(model, schedule, {25, 1, 28, 28}, diffusion::DDPM());

#include <diffusion/version.hpp>
#include <diffusion/random.hpp>
#include <diffusion/schedule.hpp>
#include <diffusion/forward.hpp>
#include <diffusion/backbone.hpp>
#include <diffusion/precision.hpp>
#include <diffusion/platform.hpp>
#include <diffusion/runtime.hpp>
#include <diffusion/sampling/spacing.hpp>
#include <diffusion/sampling/plans.hpp>
#include <diffusion/sampling/loop.hpp>
#include <diffusion/sampling/ddpm.hpp>
#include <diffusion/sampling/ddim.hpp>
#include <diffusion/sampling/dpm_solver.hpp>
#include <diffusion/formulation/formulation.hpp>
#include <diffusion/formulation/discrete.hpp>
#include <diffusion/formulation/edm.hpp>
#include <diffusion/formulation/flow.hpp>
#include <diffusion/precondition.hpp>
#include <diffusion/sampling/sampler.hpp>
#include <diffusion/sampling/euler.hpp>
#include <diffusion/sampling/euler_ancestral.hpp>
#include <diffusion/sampling/heun.hpp>
#include <diffusion/sampling/dpmpp_2m.hpp>
#include <diffusion/sampling/dpmpp_3m_sde.hpp>
#include <diffusion/registry.hpp>
#include <diffusion/guidance/autoguidance.hpp>
#include <diffusion/guidance/classifier_free.hpp>
#include <diffusion/backbones/embedding.hpp>
#include <diffusion/backbones/conv_net.hpp>
#include <diffusion/backbones/dit.hpp>
#include <diffusion/backbones/mlp.hpp>
#include <diffusion/backbones/temporal_unet.hpp>
#include <diffusion/backbones/unet.hpp>
#include <diffusion/image.hpp>
#include <diffusion/progress.hpp>
#include <diffusion/errors.hpp>
#include <diffusion/module_file.hpp>
#include <diffusion/checkpoint.hpp>
#include <diffusion/weights.hpp>
#include <diffusion/training/loss.hpp>
#include <diffusion/training/ema.hpp>
#include <diffusion/training/options.hpp>
#include <diffusion/training/hooks.hpp>
#include <diffusion/training/trainer.hpp>
#include <diffusion/training/run_directory.hpp>
#include <diffusion/training/run_outputs.hpp>
#include <diffusion/data/dataset.hpp>
#include <diffusion/data/image_folder.hpp>
#include <diffusion/data/mnist.hpp>
#include <diffusion/data/tensor_file.hpp>
#include <diffusion/data/toy.hpp>
#include <diffusion/eval/frechet.hpp>
#include <diffusion/eval/kernel.hpp>
#include <diffusion/eval/classifier.hpp>
#include <diffusion/eval/quality.hpp>
#include <diffusion/eval/sliced_wasserstein.hpp>
