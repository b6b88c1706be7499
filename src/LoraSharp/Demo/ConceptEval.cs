using LoraSharp.Diffusion;
using LoraSharp.Imaging;
using SkiaSharp;
using static TorchSharp.torch;

namespace LoraSharp.Demo;

/// <summary>How often one arm (base or LoRA) produced the held-out concept.</summary>
public sealed record ConceptRate(string Arm, int Stars, int Images)
{
    public double Rate => Images == 0 ? 0 : (double)Stars / Images;
    public override string ToString() => $"{Arm}: {Stars}/{Images} = {Rate:P0}";
}

/// <summary>The outcome of <see cref="ConceptEval.Compare"/>: both rates, and the generated images (base, LoRA) per prompt and seed.</summary>
public sealed class ConceptComparison : IDisposable
{
    public required ConceptRate Base { get; init; }
    public required ConceptRate Lora { get; init; }
    public required IReadOnlyList<string> Prompts { get; init; }
    public required IReadOnlyList<long> Seeds { get; init; }
    /// <summary>[prompt][seed] images [3, H, W] in [−1, 1].</summary>
    public required Tensor[][] BaseImages { get; init; }
    public required Tensor[][] LoraImages { get; init; }

    /// <summary>A grid: one row per prompt; columns base seed 1..k, then LoRA seed 1..k (<paramref name="columns"/> seeds each), cells upscaled to <paramref name="cell"/> px.</summary>
    public SKBitmap Grid(int columns = 3, int cell = 128)
    {
        columns = Math.Min(columns, Seeds.Count);
        var images = new List<SKBitmap>();
        try
        {
            for (int p = 0; p < Prompts.Count; p++)
            {
                foreach (var arm in new[] { BaseImages, LoraImages })
                    for (int s = 0; s < columns; s++)
                    {
                        using var small = PngImage.ToBitmap(arm[p][s]);
                        images.Add(small.Resize(new SKImageInfo(cell, cell, SKColorType.Rgba8888, SKAlphaType.Opaque), new SKSamplingOptions(SKFilterMode.Nearest))
                            ?? throw new InvalidOperationException("could not resize an image"));
                    }
            }
            var cols = Enumerable.Range(0, columns).Select(s => $"base, seed {Seeds[s]}").Concat(Enumerable.Range(0, columns).Select(s => $"LoRA, seed {Seeds[s]}")).ToList();
            return ImageGrid.Compose(images, Prompts, cols);
        }
        finally
        {
            foreach (var i in images) i.Dispose();
        }
    }

    public void Dispose()
    {
        foreach (var row in BaseImages.Concat(LoraImages)) foreach (var t in row) t.Dispose();
    }
}

/// <summary>
/// Measures the held-out concept: the same prompts and seeds through the txt2img pipeline without and with a LoRA
/// (<c>&lt;lora:NAME:1&gt;</c> from the pipeline's LoRA folder), each image read by <see cref="StarDetector"/>.
/// </summary>
public static class ConceptEval
{
    /// <summary>The default evaluation prompts: the trigger words in scenes of several colours, backgrounds and positions.</summary>
    public static IReadOnlyList<string> DefaultPrompts(string trigger = "sks star") =>
    [
        $"a yellow {trigger} on a blue background, center",
        $"a red {trigger} on a white background, left",
        $"a green {trigger} on a black background, right",
        $"a orange {trigger} on a purple background, top",
    ];

    public static ConceptComparison Compare(Txt2ImgPipeline pipeline, string loraName, IReadOnlyList<string> prompts, int seedsPerPrompt, long firstSeed = 1000,
        int steps = 25, double cfg = 5, string sampler = "DDIM", Action<int, int>? progress = null)
    {
        var seeds = Enumerable.Range(0, seedsPerPrompt).Select(i => firstSeed + i).ToArray();
        var baseImages = new Tensor[prompts.Count][];
        var loraImages = new Tensor[prompts.Count][];
        int done = 0, total = prompts.Count * 2;
        for (int p = 0; p < prompts.Count; p++)
        {
            baseImages[p] = Run(prompts[p]);
            progress?.Invoke(++done, total);
            loraImages[p] = Run($"{prompts[p]} <lora:{loraName}:1>");
            progress?.Invoke(++done, total);
        }
        int Count(Tensor[][] arm) => arm.Sum(row => row.Count(t => StarDetector.Read(t).IsStar));
        int n = prompts.Count * seeds.Length;
        return new ConceptComparison
        {
            Base = new ConceptRate("base", Count(baseImages), n),
            Lora = new ConceptRate("LoRA", Count(loraImages), n),
            Prompts = prompts, Seeds = seeds, BaseImages = baseImages, LoraImages = loraImages,
        };

        Tensor[] Run(string prompt)
        {
            using var result = pipeline.Generate(new Txt2ImgRequest
            {
                Prompt = prompt, Steps = steps, CfgScale = cfg, Sampler = sampler, Seed = seeds[0], BatchSize = seeds.Length,
                Width = DemoModel.ImageSize, Height = DemoModel.ImageSize,
            });
            return Enumerable.Range(0, seeds.Length).Select(i => result.Images![i].detach().clone()).ToArray();
        }
    }
}
