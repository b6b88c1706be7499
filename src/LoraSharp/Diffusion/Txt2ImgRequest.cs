using LoraSharp.Imaging;
using LoraSharp.Text;
using static TorchSharp.torch;

namespace LoraSharp.Diffusion;

/// <summary>One txt2img run, with A1111's meaning for every field.</summary>
public sealed record Txt2ImgRequest
{
    /// <summary>The prompt, with A1111 emphasis, BREAK and <c>&lt;lora:NAME:…&gt;</c> tags (resolved in the pipeline's LoRA folder).</summary>
    public string Prompt { get; init; } = "";
    /// <summary>The negative prompt (LoRA tags are not allowed here: A1111 applies LoRAs from the prompt only).</summary>
    public string NegativePrompt { get; init; } = "";
    public int Steps { get; init; } = 20;
    /// <summary>A1111 sampler name or id (<see cref="Samplers.Names"/>).</summary>
    public string Sampler { get; init; } = "DPM++ 2M Karras";
    public double CfgScale { get; init; } = 7;
    /// <summary>Seed of the first image; image i uses Seed + i. -1 = a random seed.</summary>
    public long Seed { get; init; } = -1;
    public int Width { get; init; } = 512;
    public int Height { get; init; } = 512;
    /// <summary>A1111 "Clip skip" (SD1.x: hidden state [-ClipSkip] + final layer norm). SD2 and SDXL use their fixed layers.</summary>
    public int ClipSkip { get; init; } = 1;
    /// <summary>
    /// Apply <see cref="ClipSkip"/> to SD 2.x as well (hidden state [-ClipSkip] of its 23-layer text encoder + final
    /// layer norm), as kohya's training and sample images do; false (default) = A1111, which ignores Clip skip for SD 2.x.
    /// </summary>
    public bool ClipSkipOnSd2 { get; init; }
    /// <summary>Images per run (one denoising batch).</summary>
    public int BatchSize { get; init; } = 1;
    /// <summary>false (default) = LoRAs run unmerged (forward hooks); true = merged into the weights (A1111's weight patching).</summary>
    public bool MergeLoras { get; init; }
    public EmphasisMode Emphasis { get; init; } = EmphasisMode.Original;
    /// <summary>
    /// A1111 option "pad prompt/negative prompt": when the prompt and negative prompt have different numbers of 75-token
    /// chunks, pad the shorter one with empty chunks and run one batch. Default off, as in A1111: the UNet then runs the
    /// negative and positive halves separately, each with its own length.
    /// </summary>
    public bool PadCondUncond { get; init; }
    /// <summary>Overrides the sampler's timestep spacing (null = the sampler's own default, as A1111 does).</summary>
    public TimestepSpacing? TimestepSpacing { get; init; }
    /// <summary>Overrides the model's prediction type (null = from the model's scheduler config, else epsilon).</summary>
    public PredictionType? Prediction { get; init; }
    /// <summary>Decode the latents with the VAE (false: only latents, e.g. for benchmarks).</summary>
    public bool Decode { get; init; } = true;
    /// <summary>Keep the prompt's LoRAs attached after the run (the next run re-uses them and detaches those it does not request).</summary>
    public bool KeepLorasLoaded { get; init; }
}

/// <summary>Progress of the denoising loop: <see cref="Step"/> steps of <see cref="Steps"/> are done.</summary>
public sealed record StepInfo(int Step, int Steps, float Timestep, TimeSpan Elapsed);

/// <summary>A LoRA applied by a run: the name written in the prompt, its file, weights and A1111 short hash.</summary>
public sealed record AppliedLora(string Name, string Path, double TextEncoderWeight, double UNetWeight, string? BlockWeights, string ShortHash);

/// <summary>
/// The outcome of a run: images [B, 3, H, W] in [-1, 1] (float32, not clamped; null when not decoded), the final
/// latents [B, C, H/8, W/8] (float32, before the VAE scaling), the seed and A1111 parameters of each image.
/// </summary>
public sealed class Txt2ImgResult : IDisposable
{
    public Tensor? Images { get; init; }
    public required Tensor Latents { get; init; }
    public required IReadOnlyList<long> Seeds { get; init; }
    public required IReadOnlyList<GenerationParameters> Parameters { get; init; }
    public required IReadOnlyList<AppliedLora> Loras { get; init; }
    /// <summary>Wall time of each denoising step.</summary>
    public required IReadOnlyList<TimeSpan> StepTimes { get; init; }

    public void Dispose()
    {
        Images?.Dispose();
        Latents.Dispose();
    }
}

/// <summary>The text conditioning of one prompt: the context [1, T, C] and, for SDXL, the pooled embedding [1, P].</summary>
public sealed class PromptEmbedding : IDisposable
{
    public required Tensor Context { get; init; }
    public Tensor? Pooled { get; init; }
    /// <summary>Number of 75-token chunks.</summary>
    public int Chunks => (int)(Context.shape[1] / 77);

    public void Dispose()
    {
        Context.Dispose();
        Pooled?.Dispose();
    }
}
